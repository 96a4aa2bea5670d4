"""Cross-validated trials (`cv_folds` K > 1): how K fold models of the development pool, trained in lockstep by
`training.epochs.iterate_epochs`, make one report.

One yield = one epoch of every fold model, so ASHA stops a trial on its fold-mean validation metric:
`val_*` is the mean over folds, `fold{i}_val_{loss,acc,auc}` (and the selection metric) each fold's curve.
`best_<metric>` (what trials are ranked by) is the mean over folds of each fold's best validation score;
each fold keeps its own best epoch's weights. The test split is in no fold and is scored once, at the end, by
ONE model: the fold model whose best validation score is best (`test_fold`). All fold models stay in the
checkpoint (one best-weights file each, `checkpoint.fold_weights`) for ensembling, and so do the out-of-fold
predictions: every development image scored by the best weights of the fold that held it out, for fitting
the temperature and the decision threshold instead of one validation split.
"""

from __future__ import annotations

import numpy as np
import torch

from trainables.training.split_run import SplitRun, _better

FOLD_CURVES = ("loss", "acc", "auc")  # per-fold validation curves (with the selection metric); MLflow caps a batch
SUMMED = ("epoch_seconds", "train_images")  # a step's cost is every fold's


def fold_mean(fold_metrics: list[dict], metric: str) -> dict:
    """One step's report: every number the mean over folds (costs summed), plus the per-fold curves."""
    keys = [k for k, v in fold_metrics[0].items() if isinstance(v, (int, float)) and k != "epoch"]
    mean = {"epoch": fold_metrics[0]["epoch"]}
    for key in keys:
        values = [m[key] for m in fold_metrics]
        mean[key] = float(np.sum(values) if key in SUMMED else np.mean(values))
    for key in ("params_total", "params_trainable", "flops_per_image", "lr"):  # one model's, not a mean
        if key in fold_metrics[0]:
            mean[key] = fold_metrics[0][key]
    curves = dict.fromkeys([*FOLD_CURVES, metric.removeprefix("val_")])
    for fold, metrics in enumerate(fold_metrics):
        mean |= {f"fold{fold}_val_{k}": metrics[f"val_{k}"] for k in curves if f"val_{k}" in metrics}
    return mean


def best_fold(runs: list[SplitRun], mode: str) -> int:
    """The fold whose best validation score is best (ties: the lower fold); it scores the test split."""
    best, score = 0, None
    for fold, run in enumerate(runs):
        if run.best_score is not None and _better(run.best_score, score, mode):
            best, score = fold, run.best_score
    return best


def out_of_fold(runs: list[SplitRun]) -> dict:
    """Every development image once, in pool order: its fold, label and the logits of that fold's best weights."""
    index = np.concatenate([run.val_index for run in runs])
    order = np.argsort(index, kind="stable")
    columns = {"index": index, "fold": np.concatenate([np.full(len(run.val_index), f) for f, run in enumerate(runs)]),
               "logits": np.concatenate([run.val_logits() for run in runs]),
               "labels": np.concatenate([run.val_set.labels for run in runs])}
    return {name: torch.from_numpy(np.ascontiguousarray(values[order])) for name, values in columns.items()}


def fold_state(run: SplitRun, epoch: int, final: bool) -> dict:
    """What one fold's checkpoint file holds (checkpoint.py writes each fold to its own file)."""
    return {"epoch": epoch, "final": final, "best_score": run.best_score, "best_epoch": run.best_epoch,
            "stem": run.stem, "dataset": run.dataset_meta(), **run.weights(epoch, final)}

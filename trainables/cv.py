"""Cross-validated trials (`cv_folds` K > 1): K fold models of the development pool trained in lockstep.

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

from collections.abc import Iterator

import numpy as np
import torch

from .datasets import Dataset
from .errors import UserError
from .splits import development_splits
from .train import Epoch, SplitRun, _better, augmented_examples, pick_device, seed_everything, use_bf16

FOLD_CURVES = ("loss", "acc", "auc")  # per-fold validation curves (with the selection metric); MLflow caps a batch
SUMMED = ("epoch_seconds", "train_images")  # a step's cost is every fold's


def iterate_cv_epochs(config: dict, dataset: Dataset, resume: dict | None = None) -> Iterator[Epoch]:
    """`iterate_epochs` for a resolved config with cv_folds > 1."""
    seed_everything(config["seed"])
    device = pick_device(config["device"])
    amp = use_bf16(config["precision"], device)
    runs = [SplitRun(config, dataset, train_idx, val_idx, device, amp, fold)
            for fold, (train_idx, val_idx) in enumerate(development_splits(dataset, config))]
    start, history = 1, []
    if resume is not None:
        if len(resume.get("folds") or ()) != len(runs):
            raise UserError(f"The checkpoint holds {len(resume.get('folds') or ())} fold models, the config asks for "
                            f"cv_folds {len(runs)}; resume with the config the trial started with")
        start, history = min(run.resume(saved) for run, saved in zip(runs, resume["folds"])), list(resume["history"])
    for run in runs:
        run.start_at(start)

    for epoch in range(start, config["epochs"] + 1):
        metrics = fold_mean([run.run_epoch(epoch) for run in runs], config["metric"])
        best = best_fold(runs, config["mode"])
        metrics["best_epoch"] = runs[best].best_epoch
        metrics["stem_resolved"] = runs[best].stem  # a string: fold_mean keeps numbers only
        history.append(metrics)
        final = epoch == config["epochs"]
        test_labels = test_probs = examples = split_labels = oof = None
        if final:  # the only place the test split is read, by one model
            for run in runs:
                run.load_best()
            oof = out_of_fold(runs)
            test_metrics, test_labels, test_probs = runs[best].score(dataset.test)
            metrics = {**metrics, **{f"test_{k}": v for k, v in test_metrics.items()}, "test_fold": best}
            examples = augmented_examples(runs[best].train_data, config["seed"], augment=runs[best].batch_augment)
            split_labels = runs[best].split_labels(test_labels)
        state = {"config": config, "epoch": epoch, "final": final, "best_score": metrics[f"best_{config['metric']}"],
                 "best_epoch": runs[best].best_epoch, "best_fold": best, "history": history,
                 "precision": "bf16" if amp else "fp32", "device": device.type, "stem": runs[best].stem,
                 "dataset": runs[best].dataset_meta(),
                 "folds": [fold_state(run, epoch, final) for run in runs], **({"oof": oof} if final else {})}
        yield Epoch(epoch, metrics, state, final, test_labels, test_probs, history, examples, split_labels,
                    runs[best].synthetic_report)  # each fold's GAN learns from its own training rows


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

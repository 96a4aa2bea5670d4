"""The one epoch driver: a trial trains K >= 1 `SplitRun`s in lockstep and yields once per epoch.

K = 1 is one train/validation split (its checkpoint holds that split's weights); K > 1 is cross-validation
(`cv_folds`, see `training.cv`: the report is the fold mean, the checkpoint holds one file per fold and the
out-of-fold predictions). The last epoch carries the test metrics: the only place the test split is read. A
single-split epoch also carries the best weights' validation predictions (kept from the validation pass that found
them, for ensemble selection after the search).
Ray Tune's trainable (trainables/ray_trainable.py) reports and checkpoints each yield; `train` prints it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from trainables.config import resolve_config
from trainables.data.datasets import Dataset, load_dataset
from trainables.data.splits import development_splits
from trainables.errors import UserError
from trainables.training.cv import best_fold, fold_mean, fold_state, out_of_fold
from trainables.training.split_run import Epoch, SplitRun, augmented_examples, pick_device, seed_everything, set_determinism, use_bf16


def iterate_epochs(config: dict, dataset: Dataset, resume: dict | None = None, *, device: torch.device | None = None,
                   runner: type[SplitRun] = SplitRun) -> Iterator[Epoch]:
    """Train `config` on `dataset`, yielding each epoch; the last one carries the test metrics.

    A data-parallel worker (trainables/distributed.py) passes its own `device` and `runner`
    (training.data_parallel.DataParallelRun); every rank yields the same epochs and metrics."""
    config = resolve_config(config)
    seed_everything(config["seed"])
    set_determinism(config["deterministic"])
    device = device or pick_device(config["device"])
    amp = use_bf16(config["precision"], device)
    runs = [runner(config, dataset, train_idx, val_idx, device, amp, fold)
            for fold, (train_idx, val_idx) in enumerate(development_splits(dataset, config))]
    cv = len(runs) > 1
    start, history = 1, []
    if resume is not None:
        saved = resume.get("folds") or () if cv else [resume]
        if len(saved) != len(runs):
            raise UserError(f"The checkpoint holds {len(saved)} fold models, the config asks for cv_folds {len(runs)}; "
                            "resume with the config the trial started with")
        start, history = min(run.resume(state) for run, state in zip(runs, saved)), list(resume["history"])
    for run in runs:
        run.start_at(start)

    for epoch in range(start, config["epochs"] + 1):
        fold_metrics = [run.run_epoch(epoch) for run in runs]
        best = best_fold(runs, config["mode"])
        lead = runs[best]  # the one model that scores test, shows its examples and names the stem
        metrics = fold_mean(fold_metrics, config["metric"]) if cv else fold_metrics[0]
        if cv:
            metrics["best_epoch"], metrics["stem_resolved"] = lead.best_epoch, lead.stem  # fold_mean keeps numbers only
        history.append(metrics)
        final = epoch == config["epochs"]
        test_labels = test_probs = examples = split_labels = None
        if final:  # the only place the test split is read, by one model
            for run in runs:
                run.load_best()
            test_metrics, test_labels, test_probs = lead.score(dataset.test)
            metrics = {**metrics, **{f"test_{k}": v for k, v in test_metrics.items()}, **({"test_fold": best} if cv else {})}
            examples = augmented_examples(lead.train_data, config["seed"], augment=lead.batch_augment)
            split_labels = lead.split_labels(test_labels)
        state = {"config": config, "epoch": epoch, "final": final,
                 "best_score": metrics[f"best_{config['metric']}"] if cv else lead.best_score,
                 "best_epoch": lead.best_epoch, "history": history, "precision": "bf16" if amp else "fp32",
                 "eval_batch": lead.eval_batch, "device": device.type, "stem": lead.stem, "dataset": lead.dataset_meta()}
        if cv:
            state |= {"best_fold": best, "folds": [fold_state(run, epoch, final) for run in runs],
                      **({"oof": out_of_fold(runs)} if final else {})}
        else:  # the best weights' validation predictions travel with the checkpoint, as the best weights do
            state |= lead.weights(epoch, final) | ({"val_predictions": lead.best_val} if lead.best_val else {})
        yield Epoch(epoch, metrics, state, final, test_labels, test_probs, history, examples, split_labels,
                    lead.synthetic_report,  # each fold's GAN learns from its own training rows
                    None if cv else lead.best_val)


def train(config: dict, data: Dataset | None = None, report: Callable[[dict], object] = print) -> dict:
    """Run a whole trial, calling `report(metrics)` once per epoch; returns the last metrics."""
    config = resolve_config(config)
    if config["workers"] > 1:
        raise UserError(f"workers {config['workers']} needs Ray Train: run the trial in a search with "
                        f"resources: {{workers: {config['workers']}}}, or set workers 1")
    dataset = data or load_dataset(config["dataset"], image_size=config["image_size"], data_root=config["data_root"],
                                   skip_bad_images=config["skip_bad_images"], split_version=config["split_version"])
    metrics: dict = {}
    for epoch in iterate_epochs(config, dataset):
        metrics = epoch.metrics
        report(metrics)
    return metrics

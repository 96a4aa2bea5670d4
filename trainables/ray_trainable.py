"""The Ray Tune function trainable: `iterate_epochs` plus one `tune.report` and checkpoint per epoch.

A trial whose loss diverges ends itself with a failure result (trainables.tracking.ranking.failure_result) instead
of raising: Ray retries every exception (`max_failures`), and this one would only happen again.

With the rest of trainables/distributed.py (a trial of several workers), the only module of `trainables` that
imports Ray. Datasets arrive through `tune.with_parameters` as references (trainables.data.datasets.DatasetRef),
keyed by (dataset spec, image size): each trial opens its dataset itself, memory-mapping the decoded cache
read-only, so no image array goes through Ray's object store.
"""

from __future__ import annotations

import tempfile

from ray import tune

from trainables.config import resolve_config
from trainables.data.datasets import DatasetRef
from trainables.distributed import run_data_parallel
from trainables.tracking.ranking import failure_result
from trainables.training.checkpoint import load_checkpoint
from trainables.training.checkpoint_files import write_epoch_checkpoint
from trainables.training.epochs import iterate_epochs
from trainables.training.split_run import NonFiniteLoss


def dataset_key(config: dict) -> tuple[str, int]:
    return config["dataset"], int(config["image_size"])


def tune_trainable(config: dict, datasets: dict[tuple[str, int], DatasetRef], variants: dict | None = None,
                   per_worker: dict | None = None) -> None:
    """One trial under Ray Tune; resumes from the trial's latest checkpoint after a restore or retry.

    `variants` maps a space's variant names to the config keys they fix (see search_spaces). `per_worker`: the
    resources of each worker of a data-parallel trial (config `workers` > 1), which Ray Train runs instead."""
    config = dict(config)
    if "variant" in config:
        config.update(variants[config.pop("variant")])
    config = resolve_config(config)
    if config["workers"] > 1:  # each rank opens the dataset itself
        run_data_parallel(config, datasets[dataset_key(config)], per_worker or {"cpu": 1.0, "gpu": 0.0})
        return
    dataset = datasets[dataset_key(config)].open()
    resume = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            resume = load_checkpoint(directory)
    try:
        _report_epochs(config, dataset, resume)
    except NonFiniteLoss as error:  # raised, Ray would retry it from the last checkpoint and diverge again
        tune.report(failure_result(config["metric"], error))


def _report_epochs(config: dict, dataset, resume: dict | None) -> None:
    gan_files: dict[str, bytes] = {}
    for epoch in iterate_epochs(config, dataset, resume):
        with tempfile.TemporaryDirectory() as directory:
            gan_files = write_epoch_checkpoint(directory, epoch, dataset, gan_files)
            tune.report(epoch.metrics, checkpoint=tune.Checkpoint.from_directory(directory))

"""The Ray Tune function trainable: `iterate_epochs` plus one `tune.report` and checkpoint per epoch.

A trial whose loss diverges ends itself with a failure result (trainables.tracking.ranking.failure_result) instead
of raising: Ray retries every exception (`max_failures`), and this one would only happen again.

The only module of `trainables` that imports Ray. Datasets arrive through `tune.with_parameters` as references
(trainables.data.datasets.DatasetRef), keyed by (dataset spec, image size): each trial opens its dataset itself,
memory-mapping the decoded cache read-only, so no image array goes through Ray's object store.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from ray import tune

from trainables.config import resolve_config
from trainables.data.datasets import DatasetRef
from trainables.tracking.ranking import failure_result
from trainables.training.checkpoint import load_checkpoint, save_checkpoint
from trainables.training.epochs import iterate_epochs
from trainables.training.figures import (
    write_gan_figures,
    write_oof_predictions,
    write_study_figures,
    write_test_predictions,
    write_trial_figures,
    write_val_predictions,
)
from trainables.training.split_run import NonFiniteLoss


def dataset_key(config: dict) -> tuple[str, int]:
    return config["dataset"], int(config["image_size"])


def tune_trainable(config: dict, datasets: dict[tuple[str, int], DatasetRef], variants: dict | None = None) -> None:
    """One trial under Ray Tune; resumes from the trial's latest checkpoint after a restore or retry.

    `variants` maps a space's variant names to the config keys they fix (see search_spaces)."""
    config = dict(config)
    if "variant" in config:
        config.update(variants[config.pop("variant")])
    config = resolve_config(config)
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
            save_checkpoint(epoch.state, directory)
            if epoch.synthetic is not None:  # in every checkpoint: an ASHA-stopped trial's last one shows the GAN too
                gan_files = gan_files or {path.name: path.read_bytes() for path in
                                          write_gan_figures(directory, dataset.class_names, epoch.synthetic)}
                for name, data in gan_files.items():  # drawn once, copied into each later checkpoint
                    (Path(directory) / name).write_bytes(data)
            if epoch.val_predictions is not None:  # every checkpoint: an ASHA-stopped trial's last one has them too
                write_val_predictions(directory, dataset.task, dataset.class_names, epoch.val_predictions,
                                      epoch.state["config"], epoch.state["dataset"])
            if epoch.final:
                write_trial_figures(directory, dataset.task, dataset.class_names, epoch.test_labels,
                                    epoch.test_probs, epoch.history)
                write_study_figures(directory, dataset.task, dataset.class_names, test_images=dataset.test.images,
                                    test_labels=epoch.test_labels, test_probs=epoch.test_probs,
                                    train_examples=epoch.train_examples, split_labels=epoch.split_labels)
                write_test_predictions(directory, dataset.task, dataset.class_names, epoch.test_labels, epoch.test_probs)
                if "oof" in epoch.state:
                    write_oof_predictions(directory, dataset.task, dataset.class_names, epoch.state["oof"])
            tune.report(epoch.metrics, checkpoint=tune.Checkpoint.from_directory(directory))

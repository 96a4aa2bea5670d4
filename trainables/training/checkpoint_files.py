"""What a trial's checkpoint folder holds beside its weights: the report files of `training.figures`, per epoch.

One writer for both kinds of trial: one process (trainables/ray_trainable.py) and data-parallel (rank 0 of
trainables/distributed.py), so analysis/ and MLflow read the same folder either way.
"""

from __future__ import annotations

import os
from pathlib import Path

from trainables.data.registry import Dataset
from trainables.training.checkpoint import save_checkpoint
from trainables.training.figures import (
    write_gan_figures,
    write_oof_predictions,
    write_study_figures,
    write_test_predictions,
    write_trial_figures,
    write_val_predictions,
)
from trainables.training.split_run import Epoch


def write_epoch_checkpoint(directory: str | os.PathLike, epoch: Epoch, dataset: Dataset, gan_files: dict[str, bytes],
                           state: dict | None = None) -> dict[str, bytes]:
    """Save `state` (default the epoch's) and the epoch's report files into `directory`; returns the GAN figures
    (drawn once, then copied into each later checkpoint: pass them back in)."""
    save_checkpoint(epoch.state if state is None else state, directory)
    if epoch.synthetic is not None:  # in every checkpoint: an ASHA-stopped trial's last one shows the GAN too
        gan_files = gan_files or {path.name: path.read_bytes() for path in
                                  write_gan_figures(directory, dataset.class_names, epoch.synthetic)}
        for name, data in gan_files.items():
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
        write_test_predictions(directory, dataset.task, dataset.class_names, epoch.test_labels, epoch.test_probs,
                               dataset.test.attributes)
        if "oof" in epoch.state:
            write_oof_predictions(directory, dataset.task, dataset.class_names, epoch.state["oof"])
    return gan_files

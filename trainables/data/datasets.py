"""Datasets by name, as uint8 arrays with a fixed test split: the one place to load any kind from.

`load_dataset("pneumoniamnist", image_size=28)` returns a `Dataset`; `kind:PATH` names the file-based kinds
(`imagefolder:`, `nih_chestxray14:`, `chexpert:`, `csv:`). The types and the registry live in `dataset_registry`, each kind
in its own module (`medmnist_files`, `folder_datasets`, `chexpert`), which register themselves when imported here.
"""

from __future__ import annotations

import functools

from trainables.data import chexpert, folder_datasets  # noqa: F401  (register chexpert:, imagefolder:, nih_chestxray14:, csv:)
from trainables.data.medmnist_files import MEDMNIST_SIZES, load_medmnist, medmnist_file
from trainables.data.registry import (
    TASKS,
    Dataset,
    ImageSet,
    check_dataset_name,
    dataset_names,
    default_data_root,
    loader,
    register_dataset,
)
from trainables.data.splits import SPLIT_VERSION

__all__ = ["TASKS", "Dataset", "ImageSet", "MEDMNIST_SIZES", "check_dataset_name", "dataset_names",
           "default_data_root", "load_dataset", "load_medmnist", "medmnist_file", "register_dataset"]


@functools.lru_cache(maxsize=8)
def load_dataset(spec: str, *, image_size: int = 28, data_root: str | None = None,
                 skip_bad_images: bool = False, split_version: int = SPLIT_VERSION) -> Dataset:
    """The dataset named `spec` (`pneumoniamnist`, or `kind:PATH`) at `image_size`, cached per process.

    `skip_bad_images` leaves unreadable image files out instead of failing (file-based kinds only).
    `split_version` is how a test split is held out when the data has none (trainables.data.splits): pass the
    trial's `config["split_version"]` so a replay of an old search gets the test split it was scored on."""
    load, path = loader(spec)
    return load(path=path, image_size=int(image_size), data_root=default_data_root(data_root),
                skip_bad_images=bool(skip_bad_images), split_version=int(split_version))


def from_image_files(spec: str) -> bool:
    """True for the file-based kinds (`kind:PATH`): their images were decoded and resized to the trial's size by
    trainables.data.image_cache. False for a MedMNIST set, whose npz file holds its images at that size already."""
    return loader(spec)[1] is not None

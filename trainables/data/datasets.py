"""Datasets by name, as uint8 arrays with a fixed test split: the one place to load any kind from.

`load_dataset("pneumoniamnist", image_size=28)` returns a `Dataset`; `kind:PATH` names the file-based kinds
(`imagefolder:`, `nih_chestxray14:`, `chexpert:`, `csv:`). The types and the registry live in `dataset_registry`, each kind
in its own module (`medmnist_files`, `folder_datasets`, `chexpert`), which register themselves when imported here.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

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

__all__ = ["TASKS", "Dataset", "DatasetRef", "ImageSet", "MEDMNIST_SIZES", "check_dataset_name", "dataset_names",
           "dataset_ref", "default_data_root", "load_dataset", "load_medmnist", "medmnist_file", "register_dataset"]


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


@dataclass(frozen=True)
class DatasetRef:
    """A dataset by its load arguments, not its pixels: what goes to trials (a few hundred bytes pickled).

    A trial opens it with `open()`, i.e. `load_dataset` in its own process: file datasets memory-map the decoded
    cache read-only (found under the node's $MEDTUNE_CACHE_DIR, or built there once behind the cache's lock when the
    node has none), MedMNIST reads its npz. The split and the test set are the driver's: they follow from the same
    files and seeds. `dev_size`/`test_size` are what the driver saw; a node whose files differ fails the trial."""

    spec: str  # file kinds: the absolute PATH, as the driver found it (a trial runs in its own working directory)
    image_size: int
    data_root: str  # absolute
    skip_bad_images: bool
    split_version: int
    dev_size: int
    test_size: int

    def open(self) -> Dataset:
        dataset = load_dataset(self.spec, image_size=self.image_size, data_root=self.data_root,
                               skip_bad_images=self.skip_bad_images, split_version=self.split_version)
        if (len(dataset.dev), len(dataset.test)) != (self.dev_size, self.test_size):
            raise RuntimeError(f"{self.spec} at {self.image_size} px has {len(dataset.dev)} development and "
                               f"{len(dataset.test)} test images on this node, the search checked {self.dev_size} and "
                               f"{self.test_size}: give every node the same data at the same path")
        return dataset


def dataset_ref(dataset: Dataset, spec: str, *, image_size: int, data_root: str | None = None,
                skip_bad_images: bool = False, split_version: int = SPLIT_VERSION) -> DatasetRef:
    """The reference a trial opens `dataset` by (loaded on the driver with these arguments)."""
    _, path = loader(spec)
    root = default_data_root(data_root)
    if path is not None:
        spec = folder_datasets.absolute_spec(spec.partition(":")[0], path, root)
    return DatasetRef(spec, int(image_size), os.path.abspath(root), bool(skip_bad_images), int(split_version),
                      len(dataset.dev), len(dataset.test))

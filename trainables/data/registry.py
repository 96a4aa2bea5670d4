"""What every dataset kind shares: the `ImageSet` / `Dataset` types and the name -> loader registry.

Loaders import this module, never `trainables.data.datasets` (the public entry that imports every loader), so
the kinds can register themselves without an import cycle.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainables.errors import unknown_name

TASKS = ("binary", "multiclass", "multilabel")
MIN_IMAGE_SIZE = 8  # pixels per side: the smallest square any loader resizes to and any trial accepts


class RowView:
    """Rows of an image array (a read-only memory map of the decoded cache) picked by index and read only when asked.

    A split of a 5 GB cache stays on disk instead of becoming a copy in the process's memory: `len`, `shape` and
    `dtype` as an array's; an index (int, slice, index array) reads those rows into a new writable array; `take`
    narrows the view without reading; `np.asarray(view)` reads every row (for small sets only)."""

    def __init__(self, base: np.ndarray, rows: np.ndarray):
        self.base, self.rows = base, np.asarray(rows, dtype=np.int64)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.rows), *self.base.shape[1:])

    @property
    def dtype(self) -> np.dtype:
        return self.base.dtype

    @property
    def ndim(self) -> int:
        return self.base.ndim

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key) -> np.ndarray:
        return np.array(self.base[self.rows[key]])  # a copy: torch wants writable arrays, the map stays read-only

    def __iter__(self):
        for row in self.rows:
            yield self.base[row]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        array = self.base[self.rows]
        return array if dtype is None else array.astype(dtype)

    def take(self, index: np.ndarray) -> RowView:
        return RowView(self.base, self.rows[index])


def take_rows(images, index: np.ndarray):
    """`images[index]`, without reading anything when `images` is a RowView."""
    return images.take(index) if isinstance(images, RowView) else images[index]


@dataclass(frozen=True)
class ImageSet:
    images: np.ndarray | RowView  # (N, H, W, C) uint8; a RowView of the memory-mapped cache for file datasets
    labels: np.ndarray  # (N,) int64 class index, or (N, L) uint8 0/1 for multi-label
    groups: np.ndarray | None = None  # patient/lesion ID per image: splits never share one
    # per-image attributes for subgroup reports ({"sex": ..., "age": ...}; trainables.data.attributes); None: none
    attributes: dict[str, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> ImageSet:
        groups = None if self.groups is None else self.groups[index]
        attributes = None if self.attributes is None else {k: v[index] for k, v in self.attributes.items()}
        return ImageSet(take_rows(self.images, index), self.labels[index], groups, attributes)


@dataclass(frozen=True)
class Dataset:
    name: str
    task: str  # binary | multiclass | multilabel
    class_names: tuple[str, ...]
    dev: ImageSet  # the development pool: everything that is not test
    test: ImageSet  # fixed; only ever scored at the end of a trial
    official_val: np.ndarray | None = None  # bool mask over `dev`: the official validation split

    @property
    def channels(self) -> int:
        return int(self.dev.images.shape[-1])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


Loader = Callable[..., Dataset]  # fn(*, path, image_size, data_root, skip_bad_images, split_version) -> Dataset
_LOADERS: dict[str, Loader] = {}


def register_dataset(name: str):
    """Add a loader `fn(*, path, image_size, data_root, skip_bad_images, split_version) -> Dataset` under `name`."""

    def add(fn: Loader) -> Loader:
        _LOADERS[name] = fn
        return fn

    return add


def dataset_names() -> list[str]:
    return sorted(_LOADERS)


def check_dataset_name(spec: str) -> None:
    """Fail fast on a misspelled name, before any data is read."""
    kind = spec.partition(":")[0]
    if kind not in _LOADERS:
        raise unknown_name("dataset", kind, dataset_names())


def loader(spec: str) -> tuple[Loader, str | None]:
    """(the registered loader, the PATH part or None) of `spec`, e.g. `imagefolder:/data/x`."""
    check_dataset_name(spec)
    kind, _, path = spec.partition(":")
    return _LOADERS[kind], path or None


def default_data_root(data_root: str | os.PathLike | None = None) -> Path:
    """`data_root`, else $MEDTUNE_DATA_ROOT, else ~/.medmnist (the medmnist package's default)."""
    chosen = data_root or os.environ.get("MEDTUNE_DATA_ROOT") or Path.home() / ".medmnist"
    return Path(chosen).expanduser()

"""Datasets by name, as uint8 arrays with a fixed test split.

`load_dataset("pneumoniamnist", image_size=28)` returns a `Dataset`; other kinds register
themselves with `@register_dataset("kind")` and are named `kind:PATH`.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import UserError, unknown_name

TASKS = ("binary", "multiclass", "multilabel")


@dataclass(frozen=True)
class ImageSet:
    images: np.ndarray  # (N, H, W, C) uint8
    labels: np.ndarray  # (N,) int64 class index, or (N, L) uint8 0/1 for multi-label
    groups: np.ndarray | None = None  # patient/lesion ID per image: splits never share one

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> "ImageSet":
        groups = None if self.groups is None else self.groups[index]
        return ImageSet(self.images[index], self.labels[index], groups)


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


_LOADERS: dict[str, Callable[..., Dataset]] = {}


def register_dataset(name: str):
    """Add a loader `fn(*, path, image_size, data_root, skip_bad_images) -> Dataset` under `name`."""

    def add(fn):
        _LOADERS[name] = fn
        return fn

    return add


def dataset_names() -> list[str]:
    return sorted(_LOADERS)


def default_data_root(data_root: str | os.PathLike | None = None) -> Path:
    """`data_root`, else $MEDTUNE_DATA_ROOT, else ~/.medmnist (the medmnist package's default)."""
    chosen = data_root or os.environ.get("MEDTUNE_DATA_ROOT") or Path.home() / ".medmnist"
    return Path(chosen).expanduser()


def check_dataset_name(spec: str) -> None:
    """Fail fast on a misspelled name, before any data is read."""
    kind, _, path = spec.partition(":")
    if kind not in _LOADERS:
        raise unknown_name("dataset", kind, dataset_names())


@functools.lru_cache(maxsize=8)
def load_dataset(spec: str, *, image_size: int = 28, data_root: str | None = None,
                 skip_bad_images: bool = False) -> Dataset:
    """The dataset named `spec` (`pneumoniamnist`, or `kind:PATH`) at `image_size`, cached per process.

    `skip_bad_images` leaves unreadable image files out instead of failing (file-based kinds only)."""
    check_dataset_name(spec)
    kind, _, path = spec.partition(":")
    return _LOADERS[kind](path=path or None, image_size=int(image_size), data_root=default_data_root(data_root),
                          skip_bad_images=bool(skip_bad_images))


# --- MedMNIST -------------------------------------------------------------------------------------

MEDMNIST_SIZES = (28, 64, 128, 224)
_MEDMNIST_TASKS = {
    "binary-class": "binary",
    "multi-class": "multiclass",
    "ordinal-regression": "multiclass",
    "multi-label, binary-class": "multilabel",
}


def medmnist_file(flag: str, image_size: int, root: Path) -> Path:
    return root / (f"{flag}.npz" if image_size == 28 else f"{flag}_{image_size}.npz")


def _fetch_medmnist(flag: str, image_size: int, root: Path) -> Path:
    """The npz file for `flag`, downloaded by the medmnist package if missing (once per node)."""
    import medmnist
    from filelock import FileLock

    path = medmnist_file(flag, image_size, root)
    if path.exists():
        return path
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if not path.exists():
            cls = getattr(medmnist, medmnist.INFO[flag]["python_class"])
            try:
                cls(split="test", root=str(root), size=image_size, download=True)
            except Exception as error:  # no network, proxy, bad checksum...
                raise UserError(
                    f"{path.name} is not in {root} and could not be downloaded ({type(error).__name__}); "
                    f"put {path.name} there or point --data-root / MEDTUNE_DATA_ROOT at a folder that has it"
                ) from None
    return path


def load_medmnist(flag: str, *, path: str | None, image_size: int, data_root: Path,
                  skip_bad_images: bool = False) -> Dataset:
    import medmnist

    if image_size not in MEDMNIST_SIZES:
        raise UserError(f"MedMNIST has no image_size {image_size}; use one of {MEDMNIST_SIZES}")
    info = medmnist.INFO[flag]
    npz_path = _fetch_medmnist(flag, image_size, Path(path) if path else data_root)
    try:
        with np.load(npz_path) as npz:
            splits = {s: (_as_nhwc(npz[f"{s}_images"]), npz[f"{s}_labels"]) for s in ("train", "val", "test")}
    except (OSError, KeyError, ValueError) as error:
        raise UserError(f"{npz_path} is not a readable MedMNIST file ({error}); delete it and download it again") from None
    task = _MEDMNIST_TASKS[info["task"]]

    def labels(raw):
        return raw.astype(np.uint8) if task == "multilabel" else raw.reshape(-1).astype(np.int64)

    (train_x, train_y), (val_x, val_y), (test_x, test_y) = splits["train"], splits["val"], splits["test"]
    dev = ImageSet(np.concatenate([train_x, val_x]), labels(np.concatenate([train_y, val_y])))
    official_val = np.r_[np.zeros(len(train_y), bool), np.ones(len(val_y), bool)]
    class_names = tuple(info["label"][str(i)] for i in range(len(info["label"])))
    return Dataset(flag, task, class_names, dev, ImageSet(test_x, labels(test_y)), official_val)


def _as_nhwc(images: np.ndarray) -> np.ndarray:
    return images[..., None] if images.ndim == 3 else images


def _register_medmnist() -> None:
    import medmnist

    for flag, info in medmnist.INFO.items():
        if not flag.endswith("3d"):
            register_dataset(flag)(functools.partial(load_medmnist, flag))


_register_medmnist()

from . import folder_datasets  # noqa: E402,F401  (registers imagefolder:, csv:, nih_chestxray14:)

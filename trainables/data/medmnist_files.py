"""MedMNIST 2D sets by name (`pneumoniamnist`, `breastmnist`, ...): the official npz files and splits.

The file is `{flag}.npz` (28 px) or `{flag}_{size}.npz` under the data root; a missing file is downloaded
by the medmnist package once per node, and a file that is not a readable MedMNIST npz is one UserError line.
Its images are decompressed once per node into two .npy files in the cache directory and memory-mapped read-only
(`mapped_images`), as file datasets are: a trial opens them by path, and every process shares one copy.
"""

from __future__ import annotations

import functools
import hashlib
import os
import zipfile
import zlib
from pathlib import Path

import numpy as np
from filelock import FileLock

from trainables.data.image_cache import default_cache_dir
from trainables.data.registry import Dataset, ImageSet, RowView, register_dataset
from trainables.errors import UserError

MEDMNIST_SIZES = (28, 64, 128, 224)
SPLITS = ("train", "val", "test")
NPZ_CACHE_FORMAT = 1  # part of the memory-mapped copy's key: bump when what `mapped_images` writes changes
_MEDMNIST_TASKS = {
    "binary-class": "binary",
    "multi-class": "multiclass",
    "ordinal-regression": "multiclass",
    "multi-label, binary-class": "multilabel",
}
# what numpy raises on a truncated or corrupt npz (a zip of .npy files)
NPZ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)


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
            except Exception as error:  # no network, proxy, bad checksum...: all end the same way for the user
                raise UserError(
                    f"{path.name} is not in {root} and could not be downloaded ({type(error).__name__}); "
                    f"put {path.name} there or point --data-root / MEDTUNE_DATA_ROOT at a folder that has it"
                ) from error
    return path


def read_medmnist_npz(path: Path, *, images: bool = True) -> dict[str, tuple[np.ndarray | None, np.ndarray]]:
    """{split: (NHWC uint8 images, or None when not `images`, raw labels)}; a corrupt file or one without the
    MedMNIST arrays is a UserError."""
    fix = f"delete it and download it again, or put the official {path.name} there"
    try:
        with np.load(path) as npz:
            missing = [f"{s}_{kind}" for s in SPLITS for kind in ("images", "labels") if f"{s}_{kind}" not in npz.files]
            if missing:
                raise UserError(f"{path} is not a MedMNIST file: it has no {missing[0]!r} array "
                                f"(it has {', '.join(npz.files) or 'none'}); {fix}")
            return {s: (_as_nhwc(npz[f"{s}_images"]) if images else None, npz[f"{s}_labels"]) for s in SPLITS}
    except NPZ_ERRORS as error:
        raise UserError(f"{path} is not a readable MedMNIST file ({type(error).__name__}: {error}); {fix}") from error


def load_medmnist(flag: str, *, path: str | None, image_size: int, data_root: Path,
                  skip_bad_images: bool = False, split_version: int | None = None) -> Dataset:
    """The official train / val / test of `flag`; `skip_bad_images` and `split_version` do not apply (fixed splits)."""
    import medmnist

    if image_size not in MEDMNIST_SIZES:
        raise UserError(f"MedMNIST has no image_size {image_size}; use one of {MEDMNIST_SIZES}")
    info = medmnist.INFO[flag]
    file = _fetch_medmnist(flag, image_size, Path(path) if path else data_root)
    splits = read_medmnist_npz(file, images=False)  # checks the file; images come memory-mapped below
    task = _MEDMNIST_TASKS[info["task"]]

    def labels(raw):
        return raw.astype(np.uint8) if task == "multilabel" else raw.reshape(-1).astype(np.int64)

    dev_x, test_x = mapped_images(file)
    (_, train_y), (_, val_y), (_, test_y) = splits["train"], splits["val"], splits["test"]
    dev = ImageSet(RowView(dev_x, np.arange(len(dev_x))), labels(np.concatenate([train_y, val_y])))
    official_val = np.r_[np.zeros(len(train_y), bool), np.ones(len(val_y), bool)]
    class_names = tuple(info["label"][str(i)] for i in range(len(info["label"])))
    return Dataset(flag, task, class_names, dev, ImageSet(RowView(test_x, np.arange(len(test_x))), labels(test_y)),
                   official_val)


def mapped_images(file: Path) -> tuple[np.ndarray, np.ndarray]:
    """(development = train then val, test) images of an npz as read-only memory maps of two .npy files in the
    cache directory, written once per node behind a lock (key: the npz's absolute path, size and mtime): every process
    reading them shares the node's page cache instead of holding its own decompressed copy."""
    stat = file.stat()
    key = hashlib.sha256(f"{NPZ_CACHE_FORMAT}\0{file.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:32]
    root = default_cache_dir() / "medmnist"
    root.mkdir(parents=True, exist_ok=True)
    paths = root / f"{file.stem}-{key}.dev.npy", root / f"{file.stem}-{key}.test.npy"
    if not all(path.exists() for path in paths):
        with FileLock(str(root / f"{key}.lock")):
            if not all(path.exists() for path in paths):
                splits = read_medmnist_npz(file)
                arrays = np.concatenate([splits["train"][0], splits["val"][0]]), splits["test"][0]
                for path, array in zip(paths, arrays):  # temp file, then rename: a killed write leaves nothing
                    temp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npy")
                    np.save(temp, array)
                    os.replace(temp, path)
    dev, test = (np.load(path, mmap_mode="r") for path in paths)
    return dev, test


def _as_nhwc(images: np.ndarray) -> np.ndarray:
    return images[..., None] if images.ndim == 3 else images


def _register_medmnist() -> None:
    import medmnist

    for flag in medmnist.INFO:
        if not flag.endswith("3d"):
            register_dataset(flag)(functools.partial(load_medmnist, flag))


_register_medmnist()

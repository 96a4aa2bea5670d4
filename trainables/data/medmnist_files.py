"""MedMNIST 2D sets by name (`pneumoniamnist`, `breastmnist`, ...): the official npz files and splits.

The file is `{flag}.npz` (28 px) or `{flag}_{size}.npz` under the data root; a missing file is downloaded
by the medmnist package once per node, and a file that is not a readable MedMNIST npz is one UserError line.
"""

from __future__ import annotations

import functools
import zipfile
import zlib
from pathlib import Path

import numpy as np

from trainables.data.registry import Dataset, ImageSet, register_dataset
from trainables.errors import UserError

MEDMNIST_SIZES = (28, 64, 128, 224)
SPLITS = ("train", "val", "test")
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


def read_medmnist_npz(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{split: (NHWC uint8 images, raw labels)}; a corrupt file or one without the MedMNIST arrays is a UserError."""
    fix = f"delete it and download it again, or put the official {path.name} there"
    try:
        with np.load(path) as npz:
            missing = [f"{s}_{kind}" for s in SPLITS for kind in ("images", "labels") if f"{s}_{kind}" not in npz.files]
            if missing:
                raise UserError(f"{path} is not a MedMNIST file: it has no {missing[0]!r} array "
                                f"(it has {', '.join(npz.files) or 'none'}); {fix}")
            return {s: (_as_nhwc(npz[f"{s}_images"]), npz[f"{s}_labels"]) for s in SPLITS}
    except NPZ_ERRORS as error:
        raise UserError(f"{path} is not a readable MedMNIST file ({type(error).__name__}: {error}); {fix}") from error


def load_medmnist(flag: str, *, path: str | None, image_size: int, data_root: Path,
                  skip_bad_images: bool = False, split_version: int | None = None) -> Dataset:
    """The official train / val / test of `flag`; `skip_bad_images` and `split_version` do not apply (fixed splits)."""
    import medmnist

    if image_size not in MEDMNIST_SIZES:
        raise UserError(f"MedMNIST has no image_size {image_size}; use one of {MEDMNIST_SIZES}")
    info = medmnist.INFO[flag]
    splits = read_medmnist_npz(_fetch_medmnist(flag, image_size, Path(path) if path else data_root))
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

    for flag in medmnist.INFO:
        if not flag.endswith("3d"):
            register_dataset(flag)(functools.partial(load_medmnist, flag))


_register_medmnist()

"""Datasets read from image files: `imagefolder:PATH`, `nih_chestxray14:PATH`, `csv:FILE`.

Options follow the path as a query string, e.g. `imagefolder:/data/derm?test_fraction=0.15&channels=3`.
Every kind accepts
    test_fraction=F   share held out as the test split when the data has no official one (default 0.2);
                      the hold-out is seeded with HOLDOUT_SEED, so every trial and search sees the same test
    channels=C        auto (default) | 1 | 3. auto = 1 (grey, L) unless most images are genuinely colour
                      (image_cache.guess_channels): X-rays saved as RGB or RGBA become 1 channel.
A relative PATH is looked up in the working directory, then under the data root (--data-root).

imagefolder:PATH   one sub-folder per class holding .png/.jpg/.jpeg files (searched recursively, hidden
                   files such as macOS `._x.jpeg` ignored). When PATH has `train/` and `test/` (and
                   optionally `val/`) sub-folders, those are the fixed splits; otherwise a stratified hold-out.
nih_chestxray14:PATH  the official NIH ChestX-ray14 layout: `Data_Entry_2017*.csv` and `images/*.png`
                   (or the `images_001/images/` ... parts). 14 findings as multi-label in NIH_FINDINGS order,
                   "No Finding" = all zeros. `test_list.txt` (official) gives the test split when present,
                   everything else is development; otherwise a hold-out grouped by `Patient ID` and
                   stratified by finding.
csv:FILE           one row per image. Options (column names):
                     image=COL   image path, relative to the CSV's folder or absolute (default `image`)
                     label=COL   one column: single-label, classes = its sorted values;
                                 label=A,B,C several 0/1 columns: multi-label (default `label`)
                     group=COL   patient / lesion ID: hold-outs and train/val splits never share one
                     split=COL   train / val / test per row: fixed splits instead of a hold-out
                   e.g. `csv:/data/ham/meta.csv?image=file&label=dx&group=lesion_id`.

Every hold-out is stratified by label and, where the data has groups (patient IDs), keeps each patient whole:
the test hold-out here and the trainer's train/validation split both come from `trainables.splits.holdout`,
made the way `split_version` says (a replay of an old search passes the version it recorded).
Unreadable images are a UserError naming the file unless `skip_bad_images`; the returned FileDataset lists
what was skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl

import numpy as np
import pandas as pd

from .config import SPLIT_VERSION
from .dataset_registry import Dataset, ImageSet, register_dataset
from .errors import UserError
from .image_cache import cached_images
from .splits import holdout

HOLDOUT_SEED = 0  # fixed: the test split must not change between trials or searches
DEFAULT_TEST_FRACTION = 0.2
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
NIH_FINDINGS = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
                "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening",
                "Hernia")  # the order of Wang et al. 2017 (ChestX-ray14) and CheXNet
NIH_NO_FINDING = "No Finding"
_COMMON_OPTIONS = ("test_fraction", "channels")


@dataclass(frozen=True)
class FileDataset(Dataset):
    """A Dataset decoded from files: remembers each image's file and what was skipped or decoded."""

    dev_files: tuple[str, ...] = ()  # file of each row of `dev`
    test_files: tuple[str, ...] = ()
    skipped_files: tuple[str, ...] = ()  # unreadable images left out (skip_bad_images)
    cache_file: str = ""  # the .npy holding the decoded images
    decoded_images: int = 0  # images decoded by this load: 0 when the cache was reused


@dataclass(frozen=True)
class _Table:
    """What a loader reads from disk before any pixel: files, labels, groups and the split of every row."""

    files: list[str]
    labels: np.ndarray
    groups: np.ndarray | None
    test: np.ndarray | None  # bool per row; None: make a hold-out
    val: np.ndarray | None = None  # bool per row: the official validation split


# --- spec parsing ---------------------------------------------------------------------------------

def parse_spec(kind: str, path: str | None, data_root: Path, extra: tuple[str, ...] = ()) -> tuple[Path, dict]:
    """`PATH?k=v&...` -> (existing path, options); unknown options and missing paths are UserErrors."""
    if not path:
        raise UserError(f"{kind}: needs a path, e.g. --dataset {kind}:/data/my_images")
    raw, _, query = path.partition("?")
    options = dict(parse_qsl(query, keep_blank_values=True))
    allowed = _COMMON_OPTIONS + extra
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise UserError(f"Unknown {kind} option {unknown[0]!r}; valid options: {', '.join(allowed)}")
    location = Path(raw).expanduser()
    if not location.exists() and not location.is_absolute() and (data_root / location).exists():
        location = data_root / location
    if not location.exists():
        raise UserError(f"{kind}: {raw} does not exist; check the path after '{kind}:'")
    return location, options


def _test_fraction(options: dict) -> float:
    try:
        fraction = float(options.get("test_fraction", DEFAULT_TEST_FRACTION))
    except ValueError:
        fraction = -1.0
    if not 0.0 < fraction < 1.0:
        raise UserError(f"Invalid test_fraction {options['test_fraction']!r}; use a fraction between 0 and 1, e.g. 0.2")
    return fraction


def _channels(options: dict) -> int | str:
    value = options.get("channels", "auto")
    if value not in ("auto", "1", "3"):
        raise UserError(f"Invalid channels {value!r}; use auto, 1 (grey) or 3 (colour)")
    return value if value == "auto" else int(value)


# --- assembling a Dataset -------------------------------------------------------------------------

def _task(labels: np.ndarray, num_classes: int) -> str:
    return "multilabel" if labels.ndim == 2 else ("binary" if num_classes == 2 else "multiclass")


def _take(images: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """A view when `rows` is one contiguous run (keeps the memmap), else a copy."""
    if len(rows) and rows[-1] - rows[0] + 1 == len(rows):
        return images[rows[0]:rows[-1] + 1]
    return images[rows]


def assemble(name: str, class_names: tuple[str, ...], table: _Table, *, image_size: int, options: dict,
             skip_bad_images: bool, split_version: int = SPLIT_VERSION) -> FileDataset:
    """Decode (or reuse) the images, hold out the test split if the data has none, drop unreadable rows."""
    if image_size < 8:
        raise UserError(f"Invalid image_size {image_size}; images are resized to a square of at least 8 pixels, e.g. 64")
    if len(class_names) < 2:
        raise UserError(f"{name}: found {len(class_names)} class(es) {list(class_names)}; a classifier needs at least 2")
    test = table.test
    if test is None:
        _, held = holdout(table.labels, table.groups, _test_fraction(options), HOLDOUT_SEED, split_version)
        test = np.zeros(len(table.files), bool)
        test[held] = True
    elif "test_fraction" in options:
        raise UserError(f"{name}: test_fraction does not apply, the data has a fixed test split; remove the option")
    cached = cached_images(table.files, image_size=image_size, channels=_channels(options))
    usable = np.zeros(len(table.files), bool)
    usable[cached.usable_rows(skip_bad_images)] = True
    dev_rows, test_rows = np.flatnonzero(usable & ~test), np.flatnonzero(usable & test)
    if not len(dev_rows) or not len(test_rows):
        empty = "test" if len(dev_rows) else "development"
        raise UserError(f"{name}: the {empty} split is empty; add images or change the split")

    def part(rows):
        groups = None if table.groups is None else table.groups[rows]
        return ImageSet(_take(cached.images, rows), table.labels[rows], groups)

    official_val = None if table.val is None or not table.val[dev_rows].any() else table.val[dev_rows]
    files = np.asarray(table.files, dtype=object)
    return FileDataset(name, _task(table.labels, len(class_names)), class_names, part(dev_rows), part(test_rows),
                       official_val, dev_files=tuple(files[dev_rows]), test_files=tuple(files[test_rows]),
                       skipped_files=tuple(file for _, file, _ in cached.bad) if skip_bad_images else (),
                       cache_file=str(cached.path), decoded_images=cached.decoded)


# --- imagefolder ----------------------------------------------------------------------------------

def _image_files(folder: Path) -> list[str]:
    """Image files under `folder`, sorted; hidden files (macOS `._` forks, .DS_Store) are not images."""
    return sorted(str(p) for p in folder.rglob("*")
                  if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _class_folders(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def read_imagefolder(root: Path) -> tuple[tuple[str, ...], _Table]:
    """(class names, table) of `root/[train|val|test/]CLASS/**/image`."""
    fixed = (root / "train").is_dir() and (root / "test").is_dir()
    if not fixed and ((root / "train").is_dir() or (root / "val").is_dir()):
        raise UserError(f"{root} has train/ or val/ but no test/ folder; add test/, or give one folder per class "
                        "for a hold-out test split")
    parts = [s for s in ("train", "val", "test") if (root / s).is_dir()] if fixed else [""]
    classes = _class_folders(root / parts[0])
    for split in parts[1:]:
        extra = sorted(set(_class_folders(root / split)) - set(classes))
        if extra:
            raise UserError(f"{root / split} has class folders {extra} that {root / parts[0]} lacks; "
                            "every split needs the same class folders")
    files, labels, split_of = [], [], []
    for split in parts:
        for index, name in enumerate(classes):
            found = _image_files(root / split / name) if (root / split / name).is_dir() else []
            files += found
            labels += [index] * len(found)
            split_of += [split] * len(found)
    if not files:
        raise UserError(f"No .png/.jpg/.jpeg images under {root}; imagefolder: expects PATH/CLASS/image files")
    split_of = np.asarray(split_of)
    table = _Table(files, np.asarray(labels, np.int64), None,
                   split_of == "test" if fixed else None, split_of == "val" if fixed else None)
    return tuple(classes), table


@register_dataset("imagefolder")
def load_imagefolder(*, path: str | None, image_size: int, data_root: Path, skip_bad_images: bool = False,
                     split_version: int = SPLIT_VERSION) -> FileDataset:
    root, options = parse_spec("imagefolder", path, data_root)
    if not root.is_dir():
        raise UserError(f"imagefolder: {root} is not a folder; give the folder that holds one sub-folder per class")
    class_names, table = read_imagefolder(root)
    return assemble(root.name, class_names, table, image_size=image_size, options=options,
                    skip_bad_images=skip_bad_images, split_version=split_version)


# --- NIH ChestX-ray14 -----------------------------------------------------------------------------

def multi_hot(findings: pd.Series, names: tuple[str, ...], separator: str = "|") -> np.ndarray:
    """'A|B' strings -> (N, L) uint8; `NIH_NO_FINDING` is all zeros; an unknown name is a UserError."""
    index = {name: j for j, name in enumerate(names)}
    out = np.zeros((len(findings), len(names)), np.uint8)
    for row, text in enumerate(findings.fillna(NIH_NO_FINDING).astype(str)):
        for finding in filter(None, (f.strip() for f in text.split(separator))):
            if finding == NIH_NO_FINDING:
                continue
            if finding not in index:
                raise UserError(f"Unknown finding {finding!r} in row {row + 1}; expected {NIH_NO_FINDING!r} or one of: "
                                f"{', '.join(names)}")
            out[row, index[finding]] = 1
    return out


def _nih_image_paths(root: Path, names: pd.Series) -> list[str]:
    """Paths for the `Image Index` names, in `images/` or the release's `images_0NN/images/` parts."""
    found = {p.name: str(p) for folder in sorted(root.glob("images_*/images")) for p in folder.iterdir()}
    default = root / "images"
    return [found.get(name) or str(default / name) for name in names]


def read_nih(root: Path) -> _Table:
    tables = sorted(root.glob("Data_Entry_2017*.csv"))  # Data_Entry_2017_v2020.csv sorts after the 2017 one
    if not tables:
        raise UserError(f"No Data_Entry_2017*.csv in {root}; nih_chestxray14: expects the official release layout")
    columns = ["Image Index", "Finding Labels", "Patient ID"]
    try:
        table = pd.read_csv(tables[-1], usecols=columns)
    except ValueError as error:
        raise UserError(f"{tables[-1]} is not the NIH label table ({error}); it needs columns {columns}") from error
    names = table["Image Index"].astype(str)
    test = None
    if (root / "test_list.txt").exists():
        listed = set((root / "test_list.txt").read_text().split())
        test = names.isin(listed).to_numpy()
        if not test.any():
            raise UserError(f"{root / 'test_list.txt'} names none of the images in {tables[-1].name}; "
                            "use the official list or remove it for a patient-grouped hold-out")
    return _Table(_nih_image_paths(root, names), multi_hot(table["Finding Labels"], NIH_FINDINGS),
                  table["Patient ID"].to_numpy(), test)


@register_dataset("nih_chestxray14")
def load_nih_chestxray14(*, path: str | None, image_size: int, data_root: Path,
                         skip_bad_images: bool = False, split_version: int = SPLIT_VERSION) -> FileDataset:
    root, options = parse_spec("nih_chestxray14", path, data_root)
    return assemble("nih_chestxray14", NIH_FINDINGS, read_nih(root), image_size=image_size, options=options,
                    skip_bad_images=skip_bad_images, split_version=split_version)


# --- CSV ------------------------------------------------------------------------------------------

_SPLIT_VALUES = ("train", "val", "test")


def _columns(table: pd.DataFrame, names: list[str], file: Path) -> None:
    missing = [name for name in names if name not in table.columns]
    if missing:
        raise UserError(f"{file} has no column {missing[0]!r}; its columns are {', '.join(map(str, table.columns))} "
                        "(choose them with ?image=...&label=...&group=...)")
    empty = [name for name in names if table[name].isna().any()]
    if empty:
        row = int(np.flatnonzero(table[empty[0]].isna().to_numpy())[0]) + 2  # +1 header, +1 one-based
        raise UserError(f"{file} line {row}: column {empty[0]!r} is empty; fill it in or drop the row")


def read_csv_table(file: Path, options: dict) -> tuple[tuple[str, ...], _Table]:
    """(class names, table) of a CSV described by the `image`, `label`, `group`, `split` options."""
    try:
        table = pd.read_csv(file)
    except (OSError, ValueError, UnicodeDecodeError) as error:
        raise UserError(f"Cannot read {file} as CSV ({type(error).__name__}: {error}); "
                        "give a comma-separated file") from error
    image, label_cols = options.get("image", "image"), options.get("label", "label").split(",")
    group, split = options.get("group"), options.get("split")
    _columns(table, [image, *label_cols, *filter(None, [group, split])], file)
    if len(label_cols) > 1:
        values = table[label_cols]
        if not values.isin([0, 1, True, False]).all().all():
            raise UserError(f"{file}: multi-label columns {label_cols} must hold 0/1; use one label column for classes")
        class_names, labels = tuple(label_cols), values.to_numpy().astype(np.uint8)
    else:
        classes = sorted(table[label_cols[0]].unique())
        class_names = tuple(str(c) for c in classes)
        labels = table[label_cols[0]].map({c: i for i, c in enumerate(classes)}).to_numpy(np.int64)
    files = [str(p if Path(p).is_absolute() else file.parent / p) for p in table[image].astype(str)]
    test = val = None
    if split:
        where = table[split].astype(str).str.strip().str.lower()
        wrong = sorted(set(where) - set(_SPLIT_VALUES))
        if wrong:
            raise UserError(f"{file}: column {split!r} has {wrong[0]!r}; use train, val or test")
        test, val = (where == "test").to_numpy(), (where == "val").to_numpy()
    groups = table[group].astype(str).to_numpy() if group else None
    return class_names, _Table(files, labels, groups, test, val)


@register_dataset("csv")
def load_csv(*, path: str | None, image_size: int, data_root: Path, skip_bad_images: bool = False,
             split_version: int = SPLIT_VERSION) -> FileDataset:
    file, options = parse_spec("csv", path, data_root, extra=("image", "label", "group", "split"))
    class_names, table = read_csv_table(file, options)
    return assemble(file.stem, class_names, table, image_size=image_size, options=options,
                    skip_bad_images=skip_bad_images, split_version=split_version)

"""Datasets read from image files: `imagefolder:PATH`, `nih_chestxray14:PATH`, `csv:FILE`.

Options follow the path as a query string, e.g. `imagefolder:/data/derm?test_fraction=0.15&channels=3`.
An unknown option or a bad value is one UserError line naming it and the fix. Every kind accepts
    test_fraction=F   share held out as the test split when the data has no official one (default 0.2);
                      the hold-out is seeded with HOLDOUT_SEED, so every trial and search sees the same test
    channels=C        auto (default) | 1 | 3. auto = 1 (grey, L) unless most images are genuinely colour
                      (image_cache.guess_channels): X-rays saved as RGB or RGBA become 1 channel.
A relative PATH is looked up in the working directory, then under the data root (--data-root).
What a loader decides on its own (a folder ignored, masks left out, a tiny val/ merged) is printed as one
`<dataset name>: ...` line per decision and kept in `FileDataset.notes`, which the leak report repeats.

imagefolder:PATH   one sub-folder per class holding .png/.jpg/.jpeg files (searched recursively). Never read:
                   hidden files and folders (macOS `._x.jpeg`, `.DS_Store`), `__MACOSX/`, and folders named
                   `masks`/`mask` (MASK_FOLDERS: the COVID-19 Radiography Database's `CLASS/{images,masks}/`
                   is read as CLASS = the folder above `images/`, its lung masks left out). A download's wrapper
                   folders are stepped into: `dataset2-master/` whose only folder is `images/` reads `images/`.
                   Fixed splits: when PATH has a train folder (`train`/`training`, any case: `TRAIN`, `Train`)
                   and a test folder (`test`/`testing`), optionally a val folder (`val`/`valid`/`validation`),
                   those are the splits; any other folder there (blood cells' `TEST_SIMPLE`, a nested copy) is
                   ignored with a note and never read as a class. Otherwise a stratified hold-out.
                     train=DIR, val=DIR, test=DIR   name a split's folder (case-insensitive), e.g. the blood
                                 cells' small unaugmented set as the test split: `?test=TEST_SIMPLE` (TEST is
                                 then the ignored folder)
                     official_val=auto|keep|merge   auto (default): an official val folder smaller than
                                 SMALL_VAL_IMAGES (100) images or SMALL_VAL_SHARE (2 %) of the development pool
                                 (Kermany's 16-image val/) is merged into the pool, so split_ratio (default 90/10)
                                 makes a validation split worth selecting on; keep / merge force either
nih_chestxray14:PATH  the NIH ChestX-ray14 release: PATH is its folder or its label CSV. In a folder the table
                   is `Data_Entry_2017*.csv`, else `sample_labels.csv` (the 5,606-image Kaggle sample); images
                   are found by name in `images/` or any `*/images/` (the release's `images_001/images/` ...,
                   the sample's `sample/images/`). 14 findings as multi-label in NIH_FINDINGS order.
                   `test_list.txt` (official, next to the images) gives the test split when present, everything
                   else is development; otherwise a hold-out grouped by `Patient ID` and stratified by finding.
                     csv=FILE    the label CSV, relative to PATH or absolute (when it is not in PATH)
                     no_finding=zeros|label   zeros (default): "No Finding" = all 14 labels 0; label: keep it
                                 as a 15th label, `No Finding`, after the 14 findings
                   Subgroup attributes (trainables.data.attributes), where the table has the columns: `sex`
                   (Patient Gender), `age` (Patient Age: integers in the release, `060Y` strings in the Kaggle
                   sample) and `view` (View Position: PA / AP).
csv:FILE           one row per image. Options (column names):
                     image=COL   image path, relative to the CSV's folder or absolute (default `image`)
                     label=COL   one column: single-label, classes = its sorted values;
                                 label=A,B,C several 0/1 columns: multi-label (default `label`)
                     group=COL   patient / lesion ID: hold-outs and train/val splits never share one
                     split=COL   train / val / test per row: fixed splits instead of a hold-out (a val of any
                                 size is kept: the column is the user's own choice)
                     subgroups=A,B   columns the export reports test metrics per value of (an age column in
                                 bands): e.g. HAM10000's `subgroups=sex,age,localization`
                   e.g. `csv:/data/ham/meta.csv?image=file&label=dx&group=lesion_id`.

Every hold-out is stratified by label and, where the data has groups (patient IDs), keeps each patient whole:
the test hold-out here and the trainer's train/validation split both come from `trainables.data.splits.holdout`,
made the way `split_version` says (a replay of an old search passes the version it recorded).
Unreadable images are a UserError naming the file unless `skip_bad_images`; the returned FileDataset lists
what was skipped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import parse_qsl

import numpy as np
import pandas as pd

from trainables.data.attributes import NIH_ATTRIBUTES, read_attributes, subgroup_columns
from trainables.data.image_cache import cached_images
from trainables.data.registry import MIN_IMAGE_SIZE, Dataset, ImageSet, RowView, register_dataset
from trainables.data.splits import SPLIT_VERSION, holdout
from trainables.errors import UserError

HOLDOUT_SEED = 0  # fixed: the test split must not change between trials or searches
DEFAULT_TEST_FRACTION = 0.2
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
NIH_FINDINGS = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
                "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening",
                "Hernia")  # the order of Wang et al. 2017 (ChestX-ray14) and CheXNet
NIH_NO_FINDING = "No Finding"
NIH_TABLES = ("Data_Entry_2017*.csv", "sample_labels.csv")  # in a folder: the release's table, else the Kaggle sample's
NO_FINDING_CHOICES = ("zeros", "label")
MASK_FOLDERS = ("mask", "masks")  # segmentation masks beside the images: never images to classify
JUNK_FOLDERS = ("__macosx",)  # archive debris, never data
SPLIT_FOLDERS = {"train": ("train", "training"), "val": ("val", "valid", "validation"), "test": ("test", "testing")}
SMALL_VAL_IMAGES = 100  # an official val folder below this many images is too small to select on ...
SMALL_VAL_SHARE = 0.02  # ... or below this share of the development pool (Kermany: 16 of 5,232)
OFFICIAL_VAL_CHOICES = ("auto", "keep", "merge")
_COMMON_OPTIONS = ("test_fraction", "channels")
_IMAGEFOLDER_OPTIONS = ("train", "val", "test", "official_val")
_NIH_OPTIONS = ("csv", "no_finding")


@dataclass(frozen=True)
class FileDataset(Dataset):
    """A Dataset decoded from files: remembers each image's file and what was skipped or decoded."""

    dev_files: tuple[str, ...] = ()  # file of each row of `dev`
    test_files: tuple[str, ...] = ()
    skipped_files: tuple[str, ...] = ()  # unreadable images left out (skip_bad_images)
    cache_file: str = ""  # the .npy holding the decoded images
    decoded_images: int = 0  # images decoded by this load: 0 when the cache was reused
    notes: tuple[str, ...] = ()  # what the loader decided on its own (folders ignored, val merged): the leak report says it


@dataclass(frozen=True)
class FileTable:
    """What a loader reads from disk before any pixel: files, labels, groups and the split of every row."""

    files: list[str]
    labels: np.ndarray
    groups: np.ndarray | None
    test: np.ndarray | None  # bool per row; None: make a hold-out
    val: np.ndarray | None = None  # bool per row: the official validation split
    notes: tuple[str, ...] = ()  # one line per decision the user did not spell out
    attributes: dict[str, np.ndarray] | None = None  # per row: sex, age, view... (trainables.data.attributes)


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
    return _locate(kind, raw, data_root), options


def _locate(kind: str, raw: str, data_root: Path) -> Path:
    """PATH as given when it exists (relative: to the working directory), else under the data root."""
    location = Path(raw).expanduser()
    if not location.exists() and not location.is_absolute() and (data_root / location).exists():
        location = data_root / location
    if not location.exists():
        raise UserError(f"{kind}: {raw} does not exist; check the path after '{kind}:'")
    return location


def absolute_spec(kind: str, path: str, data_root: Path) -> str:
    """`kind:PATH?options` with PATH made absolute as `parse_spec` finds it: a trial runs in its own folder, maybe on
    another node, where a relative PATH means nothing. Symlinks are kept (the cache key holds the paths as listed)."""
    raw, mark, query = path.partition("?")
    return f"{kind}:{os.path.abspath(_locate(kind, raw, data_root))}{mark}{query}"


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


def assemble(name: str, class_names: tuple[str, ...], table: FileTable, *, image_size: int, options: dict,
             skip_bad_images: bool, split_version: int = SPLIT_VERSION) -> FileDataset:
    """Decode (or reuse) the images, hold out the test split if the data has none, drop unreadable rows."""
    if image_size < MIN_IMAGE_SIZE:
        raise UserError(f"Invalid image_size {image_size}; images are resized to a square of at least {MIN_IMAGE_SIZE} "
                        "pixels, e.g. 64")
    if len(class_names) < 2:
        raise UserError(f"{name}: found {len(class_names)} class(es) {list(class_names)}; a classifier needs at least 2")
    test = table.test
    if test is None:
        _, held = holdout(table.labels, table.groups, _test_fraction(options), HOLDOUT_SEED, split_version)
        test = np.zeros(len(table.files), bool)
        test[held] = True
    elif "test_fraction" in options:
        raise UserError(f"{name}: test_fraction does not apply, the data has a fixed test split; remove the option")
    for note in table.notes:
        print(f"{name}: {note}", flush=True)
    cached = cached_images(table.files, image_size=image_size, channels=_channels(options))
    usable = np.zeros(len(table.files), bool)
    usable[cached.usable_rows(skip_bad_images)] = True
    dev_rows, test_rows = np.flatnonzero(usable & ~test), np.flatnonzero(usable & test)
    if not len(dev_rows) or not len(test_rows):
        empty = "test" if len(dev_rows) else "development"
        raise UserError(f"{name}: the {empty} split is empty; add images or change the split")

    def part(rows):
        groups = None if table.groups is None else table.groups[rows]
        attributes = None if not table.attributes else {k: v[rows] for k, v in table.attributes.items()}
        return ImageSet(RowView(cached.images, rows), table.labels[rows], groups, attributes)  # nothing read yet

    official_val = None if table.val is None or not table.val[dev_rows].any() else table.val[dev_rows]
    files = np.asarray(table.files, dtype=object)
    return FileDataset(name, _task(table.labels, len(class_names)), class_names, part(dev_rows), part(test_rows),
                       official_val, dev_files=tuple(files[dev_rows]), test_files=tuple(files[test_rows]),
                       skipped_files=tuple(file for _, file, _ in cached.bad) if skip_bad_images else (),
                       cache_file=str(cached.path), decoded_images=cached.decoded, notes=table.notes)


# --- imagefolder ----------------------------------------------------------------------------------

def _skipped(name: str) -> bool:
    """Dot files (macOS `._x.jpeg`, .DS_Store) and archive debris (`__MACOSX`) are never data."""
    return name.startswith(".") or name.lower() in JUNK_FOLDERS


def _is_mask_folder(name: str) -> bool:
    return name.lower() in MASK_FOLDERS


def _subfolders(folder: Path) -> list[Path]:
    """Visible sub-folders that may hold data: never hidden, debris or mask folders."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and not _skipped(p.name) and not _is_mask_folder(p.name))


def _has_images(folder: Path) -> bool:
    return any(p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() for p in folder.iterdir())


def _image_files(folder: Path) -> tuple[list[str], int]:
    """(image files under `folder`, sorted; how many sit in mask folders and were left out)."""
    images, masks = [], 0
    for path in folder.rglob("*"):
        if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
            continue
        parts = path.relative_to(folder).parts
        if any(_skipped(part) for part in parts):
            continue
        if any(_is_mask_folder(part) for part in parts[:-1]):
            masks += 1
        else:
            images.append(str(path))
    return sorted(images), masks


def _class_folders(folder: Path) -> list[str]:
    return [p.name for p in _subfolders(folder)]


def _is_split_name(name: str) -> bool:
    return any(name.lower() in names for names in SPLIT_FOLDERS.values())


def _unwrap(root: Path) -> Path:
    """The folder a download wraps its data in (`dataset2-master/` -> `images/`): follow a chain of lone
    sub-folders to one holding several; `root` itself when the chain leads nowhere better."""
    inner = root
    while not _has_images(inner) and len(folders := _subfolders(inner)) == 1 and not _is_split_name(folders[0].name):
        inner = folders[0]
    return inner if inner != root and len(_subfolders(inner)) >= 2 else root


def _named_folder(root: Path, split: str, wanted: str) -> Path:
    """The sub-folder a `train=`/`val=`/`test=` option names, matched exactly, else case-insensitively."""
    folders = _subfolders(root)
    exact = [p for p in folders if p.name == wanted] or [p for p in folders if p.name.lower() == wanted.lower()]
    if len(exact) != 1:
        found = "no such folder" if not exact else f"{len(exact)} folders match"
        raise UserError(f"imagefolder: {split}={wanted!r}: {found} in {root}; its folders are "
                        f"{', '.join(p.name for p in folders) or 'none'}")
    return exact[0]


def _found_folder(root: Path, split: str) -> Path | None:
    """The folder named like `split` in any case (`TRAIN`, `Validation`), None when absent; two is ambiguous."""
    matches = [p for p in _subfolders(root) if p.name.lower() in SPLIT_FOLDERS[split]]
    if len(matches) > 1:
        raise UserError(f"{root} has {len(matches)} {split} folders ({', '.join(p.name for p in matches)}); "
                        f"choose one with ?{split}=FOLDER")
    return matches[0] if matches else None


def _split_folders(root: Path, options: dict) -> dict[str, Path]:
    """{split: folder} of a fixed-split layout, by option or by name; {} when `root` holds one folder per class."""
    found = {split: _named_folder(root, split, options[split]) if split in options else _found_folder(root, split)
             for split in SPLIT_FOLDERS}
    found = {split: folder for split, folder in found.items() if folder is not None}
    named = set(SPLIT_FOLDERS) & set(options)
    if not named and "train" not in found and "val" not in found:
        return {}  # a lone `test` class folder is a class, as before
    if "test" not in found:
        raise UserError(f"{root} has train/ or val/ but no test/ folder; add test/ (or name it with ?test=FOLDER), "
                        "or give one folder per class for a hold-out test split")
    if "train" not in found:
        raise UserError(f"{root} has a test folder but no train/ folder; add train/ or name it with ?train=FOLDER")
    twice = [folder.name for folder in found.values() if list(found.values()).count(folder) > 1]
    if twice:
        raise UserError(f"imagefolder: folder {twice[0]!r} is named for two splits; give each split its own folder")
    return {split: found[split] for split in SPLIT_FOLDERS if split in found}


def _ignored_note(root: Path, splits: dict[str, Path]) -> list[str]:
    """One line naming the folders beside the split folders that are not read (TEST_SIMPLE, a nested copy); without
    split folders every folder is a class and none is ignored."""
    if not splits:
        return []
    ignored = [p.name for p in _subfolders(root) if p not in splits.values()]
    if not ignored:
        return []
    return [f"ignored folder(s) {', '.join(ignored)} in {root}: not a train/val/test split and never a class "
            f"(to test on one, add ?test={ignored[0]})"]


def _check_same_classes(parts: dict[str, Path], classes: list[str]) -> None:
    first = next(iter(parts.values()))
    for folder in list(parts.values())[1:]:
        extra = sorted(set(_class_folders(folder)) - set(classes))
        if extra:
            raise UserError(f"{folder} has class folders {extra} that {first} lacks; every split needs the same class folders")


def _read_classes(parts: dict[str, Path], classes: list[str]) -> tuple[list[str], list[int], list[str], int]:
    """(files, class index, split of each file, mask files left out) over every split folder and class."""
    files, labels, split_of, masks = [], [], [], 0
    for split, folder in parts.items():
        for index, name in enumerate(classes):
            found, left_out = _image_files(folder / name) if (folder / name).is_dir() else ([], 0)
            files += found
            labels += [index] * len(found)
            split_of += [split] * len(found)
            masks += left_out
    return files, labels, split_of, masks


def _too_small(val_images: int, dev_images: int) -> bool:
    """An official validation split this small makes selection noise (Kermany's 16 images: 6 accuracy points per image)."""
    return val_images < SMALL_VAL_IMAGES or val_images < SMALL_VAL_SHARE * dev_images


def _official_val_choice(options: dict, has_val: bool) -> str:
    choice = options.get("official_val", "auto")
    if choice not in OFFICIAL_VAL_CHOICES:
        raise UserError(f"Invalid official_val {choice!r}; use auto (merge a val folder under {SMALL_VAL_IMAGES} images), "
                        "keep or merge")
    if "official_val" in options and not has_val:
        raise UserError("imagefolder: official_val applies only when PATH has a val folder; remove the option")
    return choice


def merge_small_val(table: FileTable, options: dict, val_folder: str = "val") -> FileTable:
    """Merge the official validation rows into the development pool when too small (or asked), with a note."""
    has_val = table.val is not None and bool(table.val.any())
    choice = _official_val_choice(options, has_val)
    if not has_val or choice == "keep":
        return table
    val_images, dev_images = int(table.val.sum()), int((~table.test).sum())
    small = _too_small(val_images, dev_images)
    if choice == "auto" and not small:
        return table
    reason = (f"too small to select on (under {SMALL_VAL_IMAGES} images or {SMALL_VAL_SHARE:.0%} of the pool)" if small
              else "official_val=merge")
    note = (f"the official {val_folder}/ folder ({val_images} images) was merged into the development pool: {reason}; "
            "validation comes from split_ratio (default 90/10), stratified")
    return replace(table, val=None, notes=(*table.notes, note))


def read_imagefolder(root: Path, options: dict | None = None) -> tuple[tuple[str, ...], FileTable]:
    """(class names, table) of `root/[SPLIT/]CLASS/**/image`, with the notes of what was left out."""
    options = options or {}
    inner = _unwrap(root)
    notes = [f"reading {inner}: the only data folder in {root}"] if inner != root else []
    splits = _split_folders(inner, options)
    notes += _ignored_note(inner, splits)
    parts = splits or {"": inner}
    classes = _class_folders(next(iter(parts.values())))
    _check_same_classes(parts, classes)
    files, labels, split_of, masks = _read_classes(parts, classes)
    if not files:
        raise UserError(f"No .png/.jpg/.jpeg images under {root}; imagefolder: expects PATH/CLASS/image files")
    if masks:
        notes.append(f"left out {masks:,} images in {'/'.join(MASK_FOLDERS)} folders: segmentation masks, not images to classify")
    split_of = np.asarray(split_of)
    table = FileTable(files, np.asarray(labels, np.int64), None, split_of == "test" if splits else None,
                      split_of == "val" if splits else None, tuple(notes))
    return tuple(classes), merge_small_val(table, options, splits["val"].name if "val" in splits else "val")


@register_dataset("imagefolder")
def load_imagefolder(*, path: str | None, image_size: int, data_root: Path, skip_bad_images: bool = False,
                     split_version: int = SPLIT_VERSION) -> FileDataset:
    root, options = parse_spec("imagefolder", path, data_root, extra=_IMAGEFOLDER_OPTIONS)
    if not root.is_dir():
        raise UserError(f"imagefolder: {root} is not a folder; give the folder that holds one sub-folder per class")
    class_names, table = read_imagefolder(root, options)
    return assemble(root.name, class_names, table, image_size=image_size, options=options,
                    skip_bad_images=skip_bad_images, split_version=split_version)


# --- NIH ChestX-ray14 -----------------------------------------------------------------------------

def multi_hot(findings: pd.Series, names: tuple[str, ...], separator: str = "|") -> np.ndarray:
    """'A|B' strings -> (N, L) uint8; `NIH_NO_FINDING` is all zeros unless it is one of `names`; an unknown
    name is a UserError."""
    index = {name: j for j, name in enumerate(names)}
    out = np.zeros((len(findings), len(names)), np.uint8)
    for row, text in enumerate(findings.fillna(NIH_NO_FINDING).astype(str)):
        for finding in filter(None, (f.strip() for f in text.split(separator))):
            if finding == NIH_NO_FINDING and finding not in index:
                continue
            if finding not in index:
                raise UserError(f"Unknown finding {finding!r} in row {row + 1}; expected {NIH_NO_FINDING!r} or one of: "
                                f"{', '.join(names)}")
            out[row, index[finding]] = 1
    return out


def nih_label_names(options: dict) -> tuple[str, ...]:
    """The 14 findings, and "No Finding" as a 15th label with `no_finding=label` (the model-zoo study's 15)."""
    choice = options.get("no_finding", "zeros")
    if choice not in NO_FINDING_CHOICES:
        raise UserError(f"Invalid no_finding {choice!r}; use zeros (\"No Finding\" = no label set, the default) "
                        "or label (a 15th label)")
    return NIH_FINDINGS + ((NIH_NO_FINDING,) if choice == "label" else ())


def _nih_image_paths(root: Path, names: pd.Series) -> list[str]:
    """Paths for the `Image Index` names in `images/` or any `*/images/` (the release's `images_0NN/images/`,
    the Kaggle sample's `sample/images/`); a name found nowhere points into `images/` and fails as missing."""
    folders = [root / "images", *sorted(root.glob("*/images"))]
    found: dict[str, str] = {}
    for folder in filter(Path.is_dir, folders):
        for image in folder.iterdir():
            found.setdefault(image.name, str(image))
    default = root / "images"
    return [found.get(name) or str(default / name) for name in names]


def _nih_csv_option(root: Path, value: str) -> Path:
    file = Path(value).expanduser()
    file = file if file.is_absolute() else root / file
    if not file.is_file():
        raise UserError(f"nih_chestxray14: csv={value!r}: {file} does not exist; give the label CSV, absolute or "
                        f"relative to {root}")
    return file


def nih_table_file(location: Path, options: dict) -> tuple[Path, Path]:
    """(release folder, label CSV) of PATH: PATH is the CSV (its folder holds the images) or the folder, whose
    table is `csv=`, else the release's `Data_Entry_2017*.csv`, else the sample's `sample_labels.csv`."""
    if location.is_file():
        if "csv" in options:
            raise UserError(f"nih_chestxray14: {location} is already the label CSV; remove csv= or give the folder as PATH")
        return location.parent, location
    if "csv" in options:
        return location, _nih_csv_option(location, options["csv"])
    for pattern in NIH_TABLES:
        tables = sorted(location.glob(pattern))  # Data_Entry_2017_v2020.csv sorts after the 2017 one
        if tables:
            return location, tables[-1]
    raise UserError(f"No Data_Entry_2017*.csv or sample_labels.csv in {location}; give the label CSV as the path, "
                    f"e.g. nih_chestxray14:{location / 'my_labels.csv'}, or add ?csv=FILE")


def _read_nih_csv(file: Path) -> pd.DataFrame:
    columns = ["Image Index", "Finding Labels", "Patient ID"]
    try:
        table = pd.read_csv(file, usecols=lambda name: name in columns or name in NIH_ATTRIBUTES.values())
    except (ValueError, UnicodeDecodeError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__  # pandas ends some with \n
        raise UserError(f"{file} is not an NIH label table ({reason}); it needs columns {columns}") from error
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise UserError(f"{file} is not an NIH label table (no column {missing[0]!r}); it needs columns {columns}")
    return table


def _nih_test_rows(root: Path, names: pd.Series, table_name: str) -> np.ndarray | None:
    """The official `test_list.txt` as a bool per row, None when absent (a patient-grouped hold-out then)."""
    if not (root / "test_list.txt").exists():
        return None
    listed = set((root / "test_list.txt").read_text().split())
    test = names.isin(listed).to_numpy()
    if not test.any():
        raise UserError(f"{root / 'test_list.txt'} names none of the images in {table_name}; "
                        "use the official list or remove it for a patient-grouped hold-out")
    return test


def read_nih(location: Path, options: dict | None = None) -> FileTable:
    """The table of the NIH release at `location` (folder or label CSV): image paths, labels, patients, test."""
    options = options or {}
    root, file = nih_table_file(location, options)
    table = _read_nih_csv(file)
    names = table["Image Index"].astype(str)
    attributes = read_attributes(table, {k: c for k, c in NIH_ATTRIBUTES.items() if c in table.columns}, str(file))
    return FileTable(_nih_image_paths(root, names), multi_hot(table["Finding Labels"], nih_label_names(options)),
                     table["Patient ID"].to_numpy(), _nih_test_rows(root, names, file.name), attributes=attributes)


@register_dataset("nih_chestxray14")
def load_nih_chestxray14(*, path: str | None, image_size: int, data_root: Path,
                         skip_bad_images: bool = False, split_version: int = SPLIT_VERSION) -> FileDataset:
    location, options = parse_spec("nih_chestxray14", path, data_root, extra=_NIH_OPTIONS)
    class_names = nih_label_names(options)
    return assemble("nih_chestxray14", class_names, read_nih(location, options), image_size=image_size,
                    options=options, skip_bad_images=skip_bad_images, split_version=split_version)


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


def read_csv_table(file: Path, options: dict) -> tuple[tuple[str, ...], FileTable]:
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
    attributes = read_attributes(table, subgroup_columns(options.get("subgroups"), table, str(file)), str(file))
    return class_names, FileTable(files, labels, groups, test, val, attributes=attributes)


@register_dataset("csv")
def load_csv(*, path: str | None, image_size: int, data_root: Path, skip_bad_images: bool = False,
             split_version: int = SPLIT_VERSION) -> FileDataset:
    file, options = parse_spec("csv", path, data_root, extra=("image", "label", "group", "split", "subgroups"))
    class_names, table = read_csv_table(file, options)
    return assemble(file.stem, class_names, table, image_size=image_size, options=options,
                    skip_bad_images=skip_bad_images, split_version=split_version)

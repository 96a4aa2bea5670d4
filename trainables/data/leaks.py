"""Leak check: the same image, or the same patient, in two of train / validation / test.

    report = leak_report(dataset, train_idx, val_idx)    # indices into dataset.dev, as the trainer uses
    print(format_leak_report(report))
    mlflow.log_metrics(leak_metrics(report)); mlflow.log_dict(report["leak_detail"], "leak_report.json")

Images are compared by a hash of their decoded uint8 pixels (at the cached size), so the same picture
saved twice under two names is found; a re-encoded or re-cropped copy is not. Counted, per report:
    leak_dup_images           distinct images that occur more than once anywhere in train + val + test
    leak_dup_copies           rows that are one of those copies (>= 2 x leak_dup_images)
    leak_dup_cross_split      distinct images present in two or more splits: the leak itself
    leak_dup_train_val, leak_dup_train_test, leak_dup_val_test   distinct images present in both splits
    leak_dup_label_conflicts  duplicated images whose copies carry different labels (label noise)
    leak_group_train_val, leak_group_train_test, leak_group_val_test   groups (patient IDs) present in both
                              splits; only when the dataset has groups
    leak_detail               JSON-able: split sizes, up to DETAIL_LIMIT examples of each finding, and `notes`:
                              what the loader decided about the splits on its own (FileDataset.notes), e.g.
                              "the official val/ folder (16 images) was merged into the development pool: too
                              small to select on ..." (Kermany); the terminal report repeats each note
"""

from __future__ import annotations

import hashlib
from itertools import combinations

import numpy as np

SPLITS = ("train", "val", "test")
PAIRS = tuple(combinations(SPLITS, 2))
DETAIL_LIMIT = 50  # examples kept per finding in `leak_detail`


def image_hashes(images: np.ndarray) -> np.ndarray:
    """One 128-bit blake2b hex digest per image row: equal pixels <=> equal digest (up to collisions)."""
    return np.array([hashlib.blake2b(np.ascontiguousarray(row).tobytes(), digest_size=16).hexdigest()
                     for row in images], dtype=object)


def _names(dataset, part: str, count: int) -> np.ndarray:
    """The file of each row when the dataset knows it (FileDataset), else `dev[i]` / `test[i]`."""
    files = getattr(dataset, f"{part}_files", ())
    return np.asarray(files if len(files) == count else [f"{part}[{i}]" for i in range(count)], dtype=object)


def _label_keys(labels: np.ndarray) -> list[str]:
    return [",".join(map(str, np.atleast_1d(row).tolist())) for row in labels]


def leak_report(dataset, train_idx: np.ndarray, val_idx: np.ndarray) -> dict:
    """Duplicate images and shared groups across train (dev[train_idx]), val (dev[val_idx]) and test."""
    dev_hashes, test_hashes = image_hashes(dataset.dev.images), image_hashes(dataset.test.images)
    dev_names, test_names = _names(dataset, "dev", len(dataset.dev)), _names(dataset, "test", len(dataset.test))
    rows = {"train": (dev_hashes[train_idx], dev_names[train_idx], _label_keys(dataset.dev.labels[train_idx])),
            "val": (dev_hashes[val_idx], dev_names[val_idx], _label_keys(dataset.dev.labels[val_idx])),
            "test": (test_hashes, test_names, _label_keys(dataset.test.labels))}
    copies: dict[str, list[tuple[str, str, str]]] = {}  # hash -> [(split, name, label)]
    for split, (hashes, names, labels) in rows.items():
        for digest, name, label in zip(hashes, names, labels):
            copies.setdefault(digest, []).append((split, name, label))
    duplicated = {digest: found for digest, found in copies.items() if len(found) > 1}
    in_splits = {digest: {split for split, _, _ in found} for digest, found in duplicated.items()}
    cross = [digest for digest, splits in in_splits.items() if len(splits) > 1]
    conflicts = [digest for digest, found in duplicated.items() if len({label for _, _, label in found}) > 1]
    report: dict = {
        "leak_dup_images": len(duplicated),
        "leak_dup_copies": sum(len(found) for found in duplicated.values()),
        "leak_dup_cross_split": len(cross),
        **{f"leak_dup_{a}_{b}": sum(1 for s in in_splits.values() if {a, b} <= s) for a, b in PAIRS},
        "leak_dup_label_conflicts": len(conflicts),
    }
    ordered = cross + [d for d in duplicated if d not in set(cross)]  # cross-split examples first
    detail = {"sizes": {split: len(rows[split][0]) for split in SPLITS},
              "notes": [str(note) for note in getattr(dataset, "notes", ())],
              "duplicates": [[f"{split}:{name}" for split, name, _ in duplicated[d]] for d in ordered[:DETAIL_LIMIT]],
              "label_conflicts": [[f"{split}:{name}={label}" for split, name, label in duplicated[d]]
                                  for d in conflicts[:DETAIL_LIMIT]]}
    if dataset.dev.groups is not None and dataset.test.groups is not None:
        groups = {"train": dataset.dev.groups[train_idx], "val": dataset.dev.groups[val_idx], "test": dataset.test.groups}
        shared = {(a, b): sorted(set(groups[a].tolist()) & set(groups[b].tolist()), key=str) for a, b in PAIRS}
        report |= {f"leak_group_{a}_{b}": len(shared[a, b]) for a, b in PAIRS}
        detail["shared_groups"] = {f"{a}_{b}": [str(g) for g in shared[a, b][:DETAIL_LIMIT]] for a, b in PAIRS}
    report["leak_detail"] = detail
    return report


def leak_metrics(report: dict) -> dict[str, float]:
    """The numeric part of a report, for `mlflow.log_metrics`."""
    return {key: float(value) for key, value in report.items() if key != "leak_detail"}


def format_leak_report(report: dict) -> str:
    """A few lines for the terminal: LEAK or ok, counts per pair of splits and a couple of examples."""
    sizes = report["leak_detail"]["sizes"]
    has_groups = "leak_group_train_val" in report
    leaked = report["leak_dup_cross_split"] or (has_groups and any(report[f"leak_group_{a}_{b}"] for a, b in PAIRS))
    lines = [f"Leak check ({', '.join(f'{s} {n}' for s, n in sizes.items())} images): {'LEAK' if leaked else 'ok'}",
             f"  exact duplicates: {report['leak_dup_images']} images occur more than once "
             f"({report['leak_dup_copies']} copies, {report['leak_dup_label_conflicts']} with conflicting labels)",
             "  duplicates shared across splits: " + ", ".join(f"{a}-{b} {report[f'leak_dup_{a}_{b}']}" for a, b in PAIRS)]
    if has_groups:
        lines.append("  groups (patients) shared across splits: "
                     + ", ".join(f"{a}-{b} {report[f'leak_group_{a}_{b}']}" for a, b in PAIRS))
    else:
        lines.append("  groups: the dataset has no patient IDs, group overlap not checked")
    lines += [f"  e.g. {' = '.join(example)}" for example in report["leak_detail"]["duplicates"][:3]]
    lines += [f"  note: {note}" for note in report["leak_detail"].get("notes", ())]
    return "\n".join(lines)

"""The trial checkpoint: what resuming and exporting need, read back with weights_only=True."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from trainables.errors import UserError

FORMAT = "medtune-checkpoint-v2"  # v2: optimizer only in resumable checkpoints, best weights never duplicated
READABLE = ("medtune-checkpoint-v1", FORMAT)
FILENAME = "checkpoint.pt"
FOLD_FILENAME = "fold{}.pt"  # a cross-validated trial: one file per fold model beside FILENAME
# What a trial saved before a config key existed ran with: filled in wherever a checkpoint is read, so that resume,
# replay and export never guess. stem: timm's ImageNet stem; split_version 1: the unstratified patient split.
BEFORE_KEYS_EXISTED = {"stem": "imagenet", "split_version": 1, "skip_bad_images": False, "drop_path_rate": None,
                       "attn_drop_rate": None}


def save_checkpoint(state: dict, directory: str | os.PathLike) -> Path:
    """Write atomically (temp file + rename) so a killed trial never leaves a half-written file. A
    cross-validated state's `folds` go to one file each (FOLD_FILENAME), the rest to FILENAME."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    folds = state.get("folds") or []
    for number, fold in enumerate(folds):
        _write({"format": FORMAT, **fold}, directory / FOLD_FILENAME.format(number))
    rest = {key: value for key, value in state.items() if key != "folds"}
    return _write({"format": FORMAT, **rest, **({"fold_count": len(folds)} if folds else {})}, directory / FILENAME)


def _write(payload: dict, target: Path) -> Path:
    with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".tmp", delete=False) as handle:
        torch.save(payload, handle)
    os.replace(handle.name, target)
    return target


def load_checkpoint(path: str | os.PathLike) -> dict:
    """A medtune checkpoint (file or its directory); anything else is refused with one line."""
    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    if not path.is_file():
        raise UserError(f"No checkpoint at {path}; pass a trial checkpoint directory or its {FILENAME}")
    state = with_old_defaults(_read(path))
    if state.get("fold_count"):
        state["folds"] = [_read(path.parent / FOLD_FILENAME.format(number)) for number in range(state["fold_count"])]
    return state


def _read(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"No fold weights at {path}; a cross-validated checkpoint needs every {FOLD_FILENAME} file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # not a zip, a pickle with code in it, truncated...
        raise UserError(f"{path} is not a medtune checkpoint ({type(error).__name__}); export from a medtune trial") from error
    if not isinstance(state, dict) or state.get("format") not in READABLE:
        raise UserError(f"{path} is not a medtune checkpoint (format {FORMAT} expected)")
    return state


def with_old_defaults(state: dict) -> dict:
    """`state` with its config completed by BEFORE_KEYS_EXISTED (a fold file has no config: its trial's has)."""
    if "config" not in state:
        return state
    return {**state, "config": {**BEFORE_KEYS_EXISTED, **state["config"]}}


def best_weights(state: dict) -> dict:
    """The best-validation weights a checkpoint holds; a checkpoint without them is an error, never a fallback.

    v2: `model` holds the best weights when the checkpoint is final or its epoch is the best one, otherwise
    `best_model` does. v1 checkpoints always carried `best_model`. A cross-validated trial: the best fold's
    (`best_fold`, the model that scored test)."""
    if state.get("folds"):
        return best_weights(state["folds"][state["best_fold"]])
    if state.get("best_model") is not None:
        return state["best_model"]
    if state.get("final") or state.get("epoch") == state.get("best_epoch"):
        return state["model"]
    raise UserError(f"This checkpoint (epoch {state.get('epoch')}) does not hold the best-validation weights "
                    f"(epoch {state.get('best_epoch')}); pass the trial's latest checkpoint")


def fold_weights(state: dict) -> list[dict]:
    """The best-validation weights of every fold model (for ensembling); one entry for a single-split trial."""
    return [best_weights(fold) for fold in state["folds"]] if state.get("folds") else [best_weights(state)]

"""The trial checkpoint: what resuming and exporting need, read back with weights_only=True."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from .errors import UserError

FORMAT = "medtune-checkpoint-v1"
FILENAME = "checkpoint.pt"


def save_checkpoint(state: dict, directory: str | os.PathLike) -> Path:
    """Write atomically (temp file + rename) so a killed trial never leaves a half-written file."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / FILENAME
    with tempfile.NamedTemporaryFile(dir=directory, suffix=".tmp", delete=False) as handle:
        torch.save({"format": FORMAT, **state}, handle)
    os.replace(handle.name, target)
    return target


def load_checkpoint(path: str | os.PathLike) -> dict:
    """A medtune checkpoint (file or its directory); anything else is refused with one line."""
    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    if not path.is_file():
        raise UserError(f"No checkpoint at {path}; pass a trial checkpoint directory or its {FILENAME}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # not a zip, a pickle with code in it, truncated...
        raise UserError(f"{path} is not a medtune checkpoint ({type(error).__name__}); export from a medtune trial") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path} is not a medtune checkpoint (format {FORMAT} expected)")
    return state
